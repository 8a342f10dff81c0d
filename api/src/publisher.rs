//! The api's purchase publisher: the one shared by everything that publishes purchases,
//! [`upline_common::amqp::Publisher`] (persistent, `mandatory`, `message_id` = purchase id,
//! publisher confirms, reconnecting; SPEC §3), re-exported where the api's routes use it.

pub use upline_common::amqp::{PublishError, Publisher};
