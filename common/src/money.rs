//! Exact money: rupees with at most two decimal places (paise), over `rust_decimal::Decimal`.
//! On the wire money is a decimal string (`"2000.00"`); requests may also send a JSON number,
//! which is read digit for digit, never through `f64` (SPEC §2).

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Largest accepted amount: `10^12` rupees (SPEC §2).
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(3_567_587_328, 232, 0, false, 0); // 10^12

/// An amount of money in rupees, exact to the paisa. Amounts read from requests and messages
/// are never negative ([`Money::parse`]); a ledger value may be: a reversal's amount, or an
/// approved balance after a clawback of money already paid out (contract §10). Such values are
/// made with `-` and read with [`Money::parse_signed`] or [`signed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(Decimal);

/// Why a string or number is not an acceptable amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("must be a decimal number such as \"2000.00\"")]
    NotANumber,
    #[error("must be greater than zero")]
    NotPositive,
    #[error("must not be negative")]
    Negative,
    #[error("must have at most 2 decimal places")]
    TooPrecise,
    #[error("must be at most 1000000000000")]
    TooLarge,
    #[error("must be a decimal string or a JSON number")]
    WrongType,
}

impl Money {
    pub const ZERO: Money = Money(Decimal::ZERO);

    /// Parses a positive amount of at most 2 decimal places and at most `10^12`.
    ///
    /// # Errors
    /// [`MoneyError`] saying what is wrong.
    pub fn parse(s: &str) -> Result<Self, MoneyError> {
        let m = Self::parse_non_negative(s)?;
        if m.0.is_zero() {
            return Err(MoneyError::NotPositive);
        }
        Ok(m)
    }

    /// Like [`Money::parse`] but accepts zero.
    ///
    /// # Errors
    /// [`MoneyError`] saying what is wrong.
    pub fn parse_non_negative(s: &str) -> Result<Self, MoneyError> {
        let s = s.trim();
        // Plain decimal notation only: digits with an optional sign and fraction.
        let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
        if digits.is_empty()
            || digits.starts_with('.')
            || digits.ends_with('.')
            || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            || digits.bytes().filter(|&b| b == b'.').count() > 1
        {
            return Err(MoneyError::NotANumber);
        }
        // Cheap guard before Decimal (28 digits): anything this long is far above the limit
        // unless it is trailing zeros of the fraction.
        let d = Decimal::from_str_exact(s).map_err(|_| {
            if digits
                .split('.')
                .next()
                .is_some_and(|int| int.trim_start_matches('0').len() > 13)
            {
                MoneyError::TooLarge
            } else {
                MoneyError::TooPrecise
            }
        })?;
        Self::from_decimal(d)
    }

    /// Like [`Money::parse_non_negative`] but accepts a leading `-`: a ledger value (a
    /// reversal, a balance), never a request's amount.
    ///
    /// # Errors
    /// [`MoneyError`] saying what is wrong.
    pub fn parse_signed(s: &str) -> Result<Self, MoneyError> {
        match s.trim().strip_prefix('-') {
            Some(magnitude) => Self::parse_non_negative(magnitude).map(|m| -m),
            None => Self::parse_non_negative(s),
        }
    }

    /// Accepts a JSON string or number exactly (SPEC §2).
    ///
    /// # Errors
    /// [`MoneyError::WrongType`] for other JSON types, else as [`Money::parse`].
    pub fn from_json(v: &serde_json::Value) -> Result<Self, MoneyError> {
        match v {
            // With serde_json's `arbitrary_precision`, a number keeps its original digits.
            serde_json::Value::Number(n) => Self::parse(&n.to_string()),
            serde_json::Value::String(s) => Self::parse(s),
            _ => Err(MoneyError::WrongType),
        }
    }

    /// Wraps a decimal that must be non-negative, with at most 2 places, at most `10^12`.
    ///
    /// # Errors
    /// [`MoneyError`] saying which bound is broken.
    pub fn from_decimal(d: Decimal) -> Result<Self, MoneyError> {
        if d.is_sign_negative() && !d.is_zero() {
            return Err(MoneyError::Negative);
        }
        let d = d.normalize();
        if d.scale() > 2 {
            return Err(MoneyError::TooPrecise);
        }
        if d > MAX_AMOUNT {
            return Err(MoneyError::TooLarge);
        }
        Ok(Money(with_paise(d)))
    }

    /// A total from the database (sums may exceed `10^12`); rescaled to 2 places.
    pub fn from_total(d: Decimal) -> Self {
        Money(with_paise(d))
    }

    /// `self × rate`, rounded to the paisa half to even (SPEC §2).
    pub fn commission(self, rate: Decimal) -> Money {
        Money(with_paise((self.0 * rate).round_dp_with_strategy(
            2,
            RoundingStrategy::MidpointNearestEven,
        )))
    }

    /// The underlying decimal, with scale 2.
    pub fn as_decimal(self) -> Decimal {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    /// Whether this is below zero (a reversal, an overdrawn balance).
    pub fn is_negative(self) -> bool {
        self.0.is_sign_negative() && !self.0.is_zero()
    }

    /// The magnitude: `-5.00` → `5.00`.
    pub fn abs(self) -> Money {
        Money(self.0.abs())
    }

    /// `self - other`, floored at zero.
    pub fn saturating_sub(self, other: Money) -> Money {
        if other.0 >= self.0 {
            Money::ZERO
        } else {
            Money(with_paise(self.0 - other.0))
        }
    }
}

impl std::ops::Add for Money {
    type Output = Money;
    fn add(self, rhs: Money) -> Money {
        Money(with_paise(self.0 + rhs.0))
    }
}

impl std::ops::AddAssign for Money {
    fn add_assign(&mut self, rhs: Money) {
        *self = *self + rhs;
    }
}

impl std::ops::Sub for Money {
    type Output = Money;
    /// May go below zero: see [`Money`].
    fn sub(self, rhs: Money) -> Money {
        Money(with_paise(self.0 - rhs.0))
    }
}

impl std::ops::SubAssign for Money {
    fn sub_assign(&mut self, rhs: Money) {
        *self = *self - rhs;
    }
}

impl std::ops::Neg for Money {
    type Output = Money;
    fn neg(self) -> Money {
        Money(with_paise(-self.0))
    }
}

impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, |a, b| a + b)
    }
}

fn with_paise(mut d: Decimal) -> Decimal {
    d.rescale(2);
    if d.is_zero() {
        // No "-0.00" from a subtraction or negation.
        d.set_sign_positive(true);
    }
    d
}

impl fmt::Display for Money {
    /// Always two decimal places: `2000.00`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2}", self.0)
    }
}

impl FromStr for Money {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Money::parse_non_negative(s)
    }
}

impl utoipa::PartialSchema for Money {
    /// Rupees as a decimal string with two places, `"1530.00"`.
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(r"^[0-9]+\.[0-9]{2}$"))
            .description(Some("Rupees as a decimal string with two places"))
            .examples(["1530.00"])
            .into()
    }
}

impl utoipa::ToSchema for Money {}

impl Serialize for Money {
    /// As a decimal string with two places.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
    /// From a decimal string or an exact JSON number; zero allowed (totals), negatives not.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let parsed = match &v {
            serde_json::Value::Number(n) => Money::parse_non_negative(&n.to_string()),
            serde_json::Value::String(s) => Money::parse_non_negative(s),
            _ => Err(MoneyError::WrongType),
        };
        parsed.map_err(serde::de::Error::custom)
    }
}

/// Deserializes a ledger value that may be negative (`#[serde(deserialize_with =
/// "money::signed")]`): a decimal string or an exact JSON number.
///
/// # Errors
/// As [`Money::parse_signed`].
pub fn signed<'de, D: Deserializer<'de>>(d: D) -> Result<Money, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    match &v {
        serde_json::Value::Number(n) => Money::parse_signed(&n.to_string()),
        serde_json::Value::String(s) => Money::parse_signed(s),
        _ => Err(MoneyError::WrongType),
    }
    .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Money {
        Money::parse(s).expect("valid amount")
    }

    #[test]
    fn amounts_print_with_two_places() {
        assert_eq!(m("2000").to_string(), "2000.00");
        assert_eq!(m("1000.5").to_string(), "1000.50");
        assert_eq!(m("0.01").to_string(), "0.01");
        assert_eq!(MAX_AMOUNT, Decimal::from(1_000_000_000_000_i64));
    }

    #[test]
    fn bad_amounts_are_refused_with_the_reason() {
        assert_eq!(Money::parse("0"), Err(MoneyError::NotPositive));
        assert_eq!(Money::parse("-5"), Err(MoneyError::Negative));
        assert_eq!(Money::parse("1.005"), Err(MoneyError::TooPrecise));
        assert_eq!(Money::parse("1000000000000.01"), Err(MoneyError::TooLarge));
        assert_eq!(
            Money::parse("99999999999999999999999999999999"),
            Err(MoneyError::TooLarge)
        );
        assert_eq!(Money::parse("1e3"), Err(MoneyError::NotANumber));
        assert_eq!(Money::parse("abc"), Err(MoneyError::NotANumber));
        assert_eq!(Money::parse(""), Err(MoneyError::NotANumber));
        assert_eq!(Money::parse("NaN"), Err(MoneyError::NotANumber));
        assert!(Money::parse("1000000000000").is_ok());
        assert!(Money::parse("1.50").is_ok());
        assert!(
            Money::parse("1.500").is_ok(),
            "trailing zeros are not extra precision"
        );
    }

    #[test]
    fn json_numbers_are_read_exactly_not_through_f64() {
        let v: serde_json::Value = serde_json::from_str("1000.01").expect("json");
        assert_eq!(Money::from_json(&v).expect("number").to_string(), "1000.01");
        // 0.1 + 0.2 style values survive digit for digit.
        let v: serde_json::Value = serde_json::from_str("999999999999.99").expect("json");
        assert_eq!(
            Money::from_json(&v).expect("number").to_string(),
            "999999999999.99"
        );
        let v: serde_json::Value = serde_json::from_str("\"2000.00\"").expect("json");
        assert_eq!(Money::from_json(&v).expect("string").to_string(), "2000.00");
        let v: serde_json::Value = serde_json::from_str("true").expect("json");
        assert_eq!(Money::from_json(&v), Err(MoneyError::WrongType));
    }

    #[test]
    fn ledger_values_may_go_below_zero_and_read_back() {
        let overdrawn = m("100.00") - m("250.50");
        assert_eq!(overdrawn.to_string(), "-150.50");
        assert!(overdrawn.is_negative());
        assert_eq!(Money::parse_signed("-150.50"), Ok(overdrawn));
        assert_eq!(Money::parse_signed("-0.00"), Ok(Money::ZERO));
        assert_eq!((m("5.00") - m("5.00")).to_string(), "0.00");
        assert_eq!((-Money::ZERO).to_string(), "0.00");
        assert!(Money::parse_signed("--1").is_err());
        assert_eq!(Money::parse_non_negative("-1"), Err(MoneyError::Negative));
    }

    #[test]
    fn commission_rounds_half_to_even() {
        // 1000.10 × 5 % = 50.005 → 50.00 (even); 1000.30 × 5 % = 50.015 → 50.02 (even)
        assert_eq!(
            m("1000.10").commission(Decimal::new(5, 2)).to_string(),
            "50.00"
        );
        assert_eq!(
            m("1000.30").commission(Decimal::new(5, 2)).to_string(),
            "50.02"
        );
        assert_eq!(
            m("2000.00").commission(Decimal::new(1, 2)).to_string(),
            "20.00"
        );
    }
}
