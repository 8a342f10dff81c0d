//! End-to-end tests of the whole pipeline against the real PostgreSQL and RabbitMQ: each test
//! app gets its own database and its own RabbitMQ vhost, removed when it stops.

mod harness;

mod broker_permissions;
mod cluster;
mod contract;
mod crash;
mod dashboard;
mod deploy;
mod faults;
mod gates;
mod history;
mod live;
mod notifier;
mod notifier_limits;
mod openapi;
mod outbox;
mod payouts;
mod plans;
mod purchases;
mod queue;
mod refunds;
mod registration;
mod reliability;
mod reports;
mod security;
mod servers;
mod socketio;
mod sse_browser;
mod tls;
mod webhooks;
