//! The servers of this development machine (`scripts/services` starts them): the defaults of
//! the kit, never of the shipped binaries. Tools take them as overridable defaults (e.g.
//! `upline-bench --rabbitmq-management-url`, or `RABBITMQ_MANAGEMENT_URL` in the environment).

use std::path::Path;

use upline_common::Settings;

/// PostgreSQL server (user `postgres`, trust authentication), without a database name.
pub const PG_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
/// RabbitMQ AMQP listener, with the development user, without a vhost.
pub const AMQP_SERVER: &str = "amqp://guest:guest@127.0.0.1:5672";
/// RabbitMQ management API.
pub const RABBIT_MANAGEMENT: &str = "http://127.0.0.1:15672";
/// RabbitMQ administrator allowed to create vhosts and close connections.
pub const RABBIT_ADMIN_USER: &str = "guest";
/// Password of [`RABBIT_ADMIN_USER`].
pub const RABBIT_ADMIN_PASSWORD: &str = "guest";

/// The built-in defaults (no configuration file) in development, with `overrides` on top
/// (`("limits.enabled", "false")`), pointing at this machine's servers (database `upline`,
/// vhost `/`) — a [`crate::sandbox::Sandbox`] then points them at its own.
///
/// # Errors
/// An override that does not validate.
pub fn settings(overrides: &[(&str, &str)]) -> anyhow::Result<Settings> {
    let mut all = vec![("app.environment", "development")];
    all.extend_from_slice(overrides);
    let mut s = Settings::load_with_overrides(Path::new("/nonexistent/upline.toml"), &all)?;
    s.database.url = format!("{PG_SERVER}/upline");
    s.amqp.url = format!("{AMQP_SERVER}/%2f");
    Ok(s)
}
