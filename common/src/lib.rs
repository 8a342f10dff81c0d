//! Code shared by every upline service: typed configuration, money and ids, the commission
//! rules, the wire formats of purchase and earning events, the RabbitMQ topology, database
//! access, authentication tokens, abuse limits, shutdown, telemetry and the health/metrics endpoints.
//!
//! The services (`upline-api`, `upline-worker`, `upline-notifier`) depend on this crate and on
//! nothing of each other's.

pub mod amqp;
pub mod auth;
pub mod config;
pub mod db;
pub mod domain;
pub mod events;
pub mod http;
pub mod limits;
pub mod money;
pub mod protocol;
pub mod purchase;
pub mod refund;
pub mod rules;
pub mod shutdown;
pub mod telemetry;
pub mod webhook;

pub use config::Settings;
pub use domain::{Email, Level, PurchaseStatus, UserId};
pub use money::Money;
