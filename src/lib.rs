//! The `upline` launcher: every service in one process for a single machine, and the
//! operator's commands. The services themselves live in `upline-api`, `upline-worker` and
//! `upline-notifier`; this crate only wires them together.

pub mod bench;
pub mod check;
pub mod cli;
pub mod demo;
pub mod dlq;
pub mod rabbit_admin;
