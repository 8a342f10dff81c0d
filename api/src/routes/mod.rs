//! The REST resources of SPEC §6, one file each.

pub mod dashboard;
pub mod docs;
pub mod history;
pub mod payouts;
pub mod purchases;
pub mod refunds;
pub mod reports;
pub mod users;
pub mod webhooks;
