//! The domain's small types: a user's id, a level of the upline, a purchase's status and an
//! email address. Each is parsed once at the boundary (REST body, queue message, path,
//! database row) and is then valid everywhere; each has one Rust type across the services and,
//! where it is stored, one `sqlx` type.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// A user's id: the `users.id` primary key, a positive integer (`BIGINT`).
///
/// On the wire it is a JSON number; requests and queue messages may also send a string of
/// digits (`"42"`) or an integral number written with a fraction (`42.0`), SPEC §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct UserId(i64);

impl UserId {
    /// `Some` for a positive id.
    pub const fn new(id: i64) -> Option<UserId> {
        if id > 0 {
            Some(UserId(id))
        } else {
            None
        }
    }

    /// The id as stored.
    pub const fn get(self) -> i64 {
        self.0
    }

    /// Reads an id from JSON: a positive integer (`7` or `7.0`), or a string of digits.
    pub fn from_json(v: &Value) -> Option<UserId> {
        use rust_decimal::prelude::ToPrimitive;
        let id = match v {
            Value::Number(n) => match n.as_i64() {
                Some(id) => id,
                None => rust_decimal::Decimal::from_str_exact(&n.to_string())
                    .ok()
                    .filter(|d| d.fract().is_zero())?
                    .to_i64()?,
            },
            Value::String(s) => s.trim().parse().ok()?,
            _ => return None,
        };
        UserId::new(id)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a text is not a user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be a positive integer")]
pub struct NotAUserId;

impl FromStr for UserId {
    type Err = NotAUserId;

    /// Digits only, as in a path segment (`/api/users/42`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().ok().and_then(UserId::new).ok_or(NotAUserId)
    }
}

impl From<UserId> for i64 {
    fn from(id: UserId) -> i64 {
        id.0
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        UserId::from_json(&v).ok_or_else(|| serde::de::Error::custom(NotAUserId))
    }
}

/// The most levels `commission.rates` may configure (SPEC §2).
pub const MAX_LEVELS: u8 = 10;

/// A level of the buyer's upline: 1 is the buyer's direct referrer, 2 that referrer's
/// referrer, up to [`MAX_LEVELS`]. Stored as `SMALLINT`; a JSON number on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Level(u8);

impl Level {
    /// The buyer's direct referrer.
    pub const FIRST: Level = Level(1);

    /// `Some` for 1..=[`MAX_LEVELS`].
    pub const fn new(level: u8) -> Option<Level> {
        if level >= 1 && level <= MAX_LEVELS {
            Some(Level(level))
        } else {
            None
        }
    }

    /// The level counted from 1.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The position of this level's entry in a per-level list (`rates`, totals): `level - 1`.
    pub const fn index(self) -> usize {
        self.0 as usize - 1
    }

    /// Levels 1..=`count` (at most [`MAX_LEVELS`]).
    pub fn up_to(count: usize) -> impl Iterator<Item = Level> {
        (1..=count.min(MAX_LEVELS as usize)).map(|l| Level(l as u8))
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a number is not a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a level is 1 to 10")]
pub struct NotALevel;

impl TryFrom<u8> for Level {
    type Error = NotALevel;
    fn try_from(level: u8) -> Result<Self, NotALevel> {
        Level::new(level).ok_or(NotALevel)
    }
}

impl TryFrom<i16> for Level {
    type Error = NotALevel;
    fn try_from(level: i16) -> Result<Self, NotALevel> {
        u8::try_from(level)
            .ok()
            .and_then(Level::new)
            .ok_or(NotALevel)
    }
}

impl From<Level> for u8 {
    fn from(level: Level) -> u8 {
        level.0
    }
}

impl From<Level> for i16 {
    fn from(level: Level) -> i16 {
        i16::from(level.0)
    }
}

impl sqlx::Type<sqlx::Postgres> for Level {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <i16 as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl<'q> sqlx::Encode<'q, sqlx::Postgres> for Level {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <i16 as sqlx::Encode<sqlx::Postgres>>::encode(i16::from(*self), buf)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for Level {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let raw = <i16 as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        Ok(Level::try_from(raw)?)
    }
}

/// What a worker recorded for a purchase (`purchases.status`, SPEC §6): `processed` (the
/// levels were decided, whatever they paid) or `rejected` (invalid content, with a reason).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum PurchaseStatus {
    Processed,
    Rejected,
}

impl PurchaseStatus {
    /// The stored and wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            PurchaseStatus::Processed => "processed",
            PurchaseStatus::Rejected => "rejected",
        }
    }
}

impl fmt::Display for PurchaseStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user's email address as registration accepts it: at most 254 characters, no whitespace,
/// one `@` with a non-empty local part and a dotted domain. Surrounding whitespace is trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(try_from = "String", into = "String")]
#[sqlx(transparent)]
pub struct Email(String);

/// Why a text is not an acceptable email address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    #[error("is required")]
    Missing,
    #[error("must be an email address such as asha@example.com")]
    Malformed,
}

impl Email {
    /// # Errors
    /// [`EmailError`] saying what is wrong.
    pub fn parse(s: &str) -> Result<Email, EmailError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(EmailError::Missing);
        }
        let valid = s.len() <= 254
            && !s.chars().any(char::is_whitespace)
            && s.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty()
                    && !domain.contains('@')
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
            });
        if valid {
            Ok(Email(s.to_owned()))
        } else {
            Err(EmailError::Malformed)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Email {
    type Error = EmailError;
    fn try_from(s: String) -> Result<Self, EmailError> {
        Email::parse(&s)
    }
}

impl From<Email> for String {
    fn from(e: Email) -> String {
        e.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The OpenAPI schemas of the newtypes: what they accept, with the bounds utoipa's derive
/// cannot put on a tuple struct.
mod schemas {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, SchemaType, Type};
    use utoipa::openapi::{RefOr, Schema};
    use utoipa::{PartialSchema, ToSchema};

    use super::{Email, Level, UserId, MAX_LEVELS};

    impl PartialSchema for UserId {
        fn schema() -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::Integer))
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .minimum(Some(1))
                .description(Some("A user's id: a positive integer"))
                .examples([42])
                .into()
        }
    }
    impl ToSchema for UserId {}

    impl PartialSchema for Level {
        fn schema() -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::Integer))
                .minimum(Some(1))
                .maximum(Some(MAX_LEVELS))
                .description(Some(
                    "A level of the upline: 1 is the buyer's direct referrer",
                ))
                .examples([1])
                .into()
        }
    }
    impl ToSchema for Level {}

    impl PartialSchema for Email {
        fn schema() -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::String))
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Email)))
                .min_length(Some(3))
                .max_length(Some(254))
                .examples(["asha@example.com"])
                .into()
        }
    }
    impl ToSchema for Email {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_read_leniently_and_written_as_numbers() {
        for (json, expected) in [
            ("42", Some(42)),
            ("\"42\"", Some(42)),
            ("42.0", Some(42)),
            ("0", None),
            ("-3", None),
            ("4.5", None),
            ("\"x\"", None),
            ("true", None),
            ("99999999999999999999", None),
        ] {
            let got = serde_json::from_str::<UserId>(json).ok().map(UserId::get);
            assert_eq!(got, expected, "{json}");
        }
        let id: UserId = "7".parse().expect("digits");
        assert_eq!(serde_json::to_string(&id).expect("serialises"), "7");
        assert_eq!("0".parse::<UserId>(), Err(NotAUserId));
    }

    #[test]
    fn levels_are_one_to_ten() {
        assert_eq!(Level::new(0), None);
        assert_eq!(Level::new(11), None);
        assert_eq!(Level::try_from(3_i16).map(Level::index), Ok(2));
        assert_eq!(
            serde_json::from_str::<Level>("2").map(u8::from).ok(),
            Some(2)
        );
        assert!(serde_json::from_str::<Level>("0").is_err());
        assert_eq!(Level::up_to(3).map(u8::from).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn emails_are_checked_and_trimmed() {
        assert_eq!(
            Email::parse(" asha@example.com ").map(|e| e.as_str().to_owned()),
            Ok("asha@example.com".to_owned())
        );
        assert_eq!(Email::parse("  "), Err(EmailError::Missing));
        for bad in [
            "asha",
            "@example.com",
            "a@b",
            "a@.com",
            "a@b.",
            "a b@c.d",
            "a@b@c.d",
        ] {
            assert_eq!(Email::parse(bad), Err(EmailError::Malformed), "{bad}");
        }
    }

    #[test]
    fn statuses_have_their_stored_names() {
        assert_eq!(
            serde_json::to_string(&PurchaseStatus::Rejected).expect("serialises"),
            "\"rejected\""
        );
        assert_eq!(PurchaseStatus::Processed.as_str(), "processed");
    }
}
