//! The REST resources of SPEC §6, one file each.

pub mod dashboard;
pub mod docs;
pub mod purchases;
pub mod reports;
pub mod users;
