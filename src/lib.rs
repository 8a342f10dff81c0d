//! The `upline` launcher: every service in one process for a single machine, and the
//! operator's commands (`migrate`, `dlq`). The services themselves live in `upline-api`,
//! `upline-worker` and `upline-notifier`; this crate only wires them together. Benchmarks and
//! the demo are dev binaries of `upline-testkit`, not part of this one.

pub mod cli;
pub mod dlq;
