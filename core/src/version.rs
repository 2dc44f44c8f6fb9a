//! Entity versions. A version is read from the event at the stream's `version` path:
//! a JSON number compares numerically (exactly, arbitrary precision), a string is an
//! RFC 3339 timestamp and compares as the instant it names. Both are kept on one axis —
//! a timestamp is its Unix epoch in seconds (nanosecond precision) — so a stream that
//! switches from epoch-second numbers to timestamps still orders correctly.

use bigdecimal::num_bigint::BigInt;
use bigdecimal::{BigDecimal, ToPrimitive};
use serde_json::Value;
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// Bound on digits and exponent: keeps comparisons cheap and every version storable
/// in a PostgreSQL `numeric`, whatever a hostile event carries.
const MAX_DIGITS: u64 = 200;
const MAX_SCALE: i64 = 200;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version(Repr);

/// Most versions are integers (sequence numbers, epoch seconds or milliseconds): those that fit an
/// `i64` are kept as one, and compare, parse and print without arbitrary-precision arithmetic.
/// The representation is canonical (a value that fits `Int` is never `Decimal`), so the derived
/// equality and hash are those of the numbers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Repr {
    Int(i64),
    /// Any other number, normalized.
    Decimal(BigDecimal),
}

impl Ord for Version {
    fn cmp(&self, other: &Version) -> Ordering {
        match (&self.0, &other.0) {
            (Repr::Int(a), Repr::Int(b)) => a.cmp(b),
            (Repr::Decimal(a), Repr::Decimal(b)) => a.cmp(b),
            (Repr::Int(a), Repr::Decimal(b)) => BigDecimal::from(*a).cmp(b),
            (Repr::Decimal(a), Repr::Int(b)) => a.cmp(&BigDecimal::from(*b)),
        }
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Version) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Version {
    /// Reads a version from a JSON value. `Ok(None)` when absent (null).
    pub fn from_json(value: &Value) -> Result<Option<Version>, String> {
        match value {
            Value::Null => Ok(None),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Ok(Some(Version::from_i64(i))),
                None => Version::parse_decimal(&n.to_string()).map(Some),
            },
            Value::String(s) => Version::parse_timestamp(s).map(Some),
            other => Err(format!(
                "a version must be a JSON number or an RFC 3339 timestamp string, not {}",
                json_type(other)
            )),
        }
    }

    /// Parses a decimal number (as JSON or PostgreSQL `numeric` text).
    pub fn parse_decimal(text: &str) -> Result<Version, String> {
        // Up to 18 digits always fit an i64.
        let digits = text.strip_prefix('-').unwrap_or(text);
        if !digits.is_empty() && digits.len() <= 18 && digits.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Version::from_i64(text.parse().expect("18 digits fit an i64")));
        }
        let d = BigDecimal::from_str(text).map_err(|e| format!("version {text:?} is not a number: {e}"))?;
        let (_, scale) = d.as_bigint_and_exponent();
        if scale.abs() > MAX_SCALE || d.digits() > MAX_DIGITS {
            return Err(format!(
                "version {} is out of range (at most {MAX_DIGITS} digits and exponent ±{MAX_SCALE})",
                truncate(text, 40)
            ));
        }
        Ok(Version::from_decimal(d))
    }

    /// Parses an RFC 3339 timestamp into epoch seconds with nanosecond precision.
    pub fn parse_timestamp(text: &str) -> Result<Version, String> {
        let ts = chrono::DateTime::parse_from_rfc3339(text)
            .map_err(|e| format!("version {:?} is not an RFC 3339 timestamp: {e}", truncate(text, 60)))?;
        let nanos =
            BigInt::from(ts.timestamp()) * BigInt::from(1_000_000_000i64) + BigInt::from(ts.timestamp_subsec_nanos());
        Ok(Version::from_decimal(BigDecimal::new(nanos, 9)))
    }

    /// The version as text that PostgreSQL's `numeric` input accepts (plain notation).
    pub fn to_numeric_string(&self) -> String {
        match &self.0 {
            Repr::Int(i) => i.to_string(),
            Repr::Decimal(d) => d.to_plain_string(),
        }
    }

    /// The version as the RFC 3339 timestamp (UTC) it is the epoch of, when it can be one (at
    /// most nanosecond precision, within chrono's range): `parse_timestamp` of the result gives
    /// this version back.
    pub fn to_rfc3339(&self) -> Option<String> {
        let (secs, nanos) = match &self.0 {
            Repr::Int(i) => (*i, 0u32),
            Repr::Decimal(d) => {
                let scaled = (d * BigDecimal::from(1_000_000_000i64)).normalized();
                if !scaled.is_integer() {
                    return None;
                }
                let total = scaled.to_i128()?;
                (i64::try_from(total.div_euclid(1_000_000_000)).ok()?, total.rem_euclid(1_000_000_000) as u32)
            }
        };
        let ts = chrono::DateTime::from_timestamp(secs, nanos)?;
        Some(ts.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    }

    /// An integer version.
    pub fn from_i64(v: i64) -> Version {
        Version(Repr::Int(v))
    }

    /// The canonical version of a number: an integer that fits an i64 as one.
    fn from_decimal(d: BigDecimal) -> Version {
        let d = d.normalized();
        match d.is_integer().then(|| d.to_i64()).flatten() {
            Some(i) => Version(Repr::Int(i)),
            None => Version(Repr::Decimal(d)),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_numeric_string())
    }
}

pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn v(j: Value) -> Version {
        Version::from_json(&j).unwrap().unwrap()
    }

    #[test]
    fn timestamps_print_back_as_the_same_version() {
        for text in ["2024-01-01T00:00:00.1234567Z", "2019-10-26T23:56:45+02:00", "1969-12-31T23:59:59.5Z"] {
            let version = Version::parse_timestamp(text).unwrap();
            let printed = version.to_rfc3339().unwrap();
            assert_eq!(Version::parse_timestamp(&printed).unwrap(), version, "{text} -> {printed}");
        }
        assert_eq!(Version::from_i64(0).to_rfc3339().unwrap(), "1970-01-01T00:00:00Z");
        // Finer than a nanosecond: no timestamp names it.
        assert_eq!(Version::parse_decimal("1.0000000001").unwrap().to_rfc3339(), None);
    }

    #[test]
    fn numbers_compare_numerically() {
        assert!(v(json!(9)) < v(json!(10)));
        assert!(v(json!(1.5)) < v(json!(2)));
        assert_eq!(v(json!(2.0)), v(json!(2)));
        assert!(v(json!(-3)) < v(json!(0)));
    }

    #[test]
    fn big_numbers_are_exact() {
        let a: Value = serde_json::from_str("123456789012345678901234567890").unwrap();
        let b: Value = serde_json::from_str("123456789012345678901234567891").unwrap();
        assert!(v(a) < v(b));
    }

    #[test]
    fn timestamps_compare_as_instants() {
        let a = v(json!("2024-01-01T10:00:00+02:00"));
        let b = v(json!("2024-01-01T09:00:00Z"));
        assert!(a < b, "10:00+02 is 08:00Z, before 09:00Z");
        let c = v(json!("2024-01-01T09:00:00.000000001Z"));
        assert!(b < c);
        assert_eq!(v(json!("1970-01-01T00:00:10Z")), v(json!(10)));
    }

    #[test]
    fn invalid_versions_are_explained() {
        assert!(Version::from_json(&json!("yesterday")).unwrap_err().contains("RFC 3339"));
        assert!(Version::from_json(&json!(true)).unwrap_err().contains("boolean"));
        assert!(Version::from_json(&json!({})).unwrap_err().contains("object"));
        let huge: Value = serde_json::from_str("1e999999999").unwrap();
        assert!(Version::from_json(&huge).unwrap_err().contains("out of range"));
        assert_eq!(Version::from_json(&Value::Null).unwrap(), None);
    }

    /// Decimal texts: any i64, the i64 limits and just past them, decimals with trailing zeros,
    /// exponents and numbers beyond an i64.
    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|i| i.to_string()),
            (any::<i32>(), 0..4usize, 0..3usize).prop_map(|(i, frac, zeros)| {
                let frac: String = (0..frac).map(|d| char::from(b'1' + d as u8)).collect();
                format!("{i}.{frac}{}", "0".repeat(zeros))
            }),
            (-3i64..3, 0..2u8).prop_map(|(d, sign)| {
                let edge =
                    if sign == 0 { i128::from(i64::MAX) + i128::from(d) } else { i128::from(i64::MIN) + i128::from(d) };
                edge.to_string()
            }),
            (any::<i16>(), -4i32..20).prop_map(|(m, e)| format!("{m}e{e}")),
            "[1-9][0-9]{18,30}(\\.[0-9]{1,5})?",
        ]
    }

    proptest::proptest! {
        #[test]
        fn integers_kept_as_i64_compare_as_exact_decimals(a in number(), b in number()) {
            let (va, vb) = (Version::parse_decimal(&a).unwrap(), Version::parse_decimal(&b).unwrap());
            let (da, db) = (BigDecimal::from_str(&a).unwrap(), BigDecimal::from_str(&b).unwrap());
            proptest::prop_assert_eq!(va.cmp(&vb), da.cmp(&db), "{} vs {}", a, b);
            proptest::prop_assert_eq!(va == vb, da == db);
            proptest::prop_assert_eq!(Version::parse_decimal(&va.to_numeric_string()).unwrap(), va.clone());
            // The same number through the other representation is equal, with the same hash.
            let other = Version::parse_decimal(&format!("{}.000", va.to_numeric_string().trim_end_matches('.')));
            if !va.to_numeric_string().contains('.') {
                let other = other.unwrap();
                let hash = |v: &Version| {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    v.hash(&mut h);
                    h.finish()
                };
                proptest::prop_assert_eq!(&other, &va);
                proptest::prop_assert_eq!(hash(&other), hash(&va));
            }
            if let Ok(i) = a.parse::<i64>() {
                proptest::prop_assert_eq!(Version::from_json(&json!(i)).unwrap().unwrap(), va);
            }
        }
    }

    #[test]
    fn numeric_text_round_trips() {
        for text in ["0", "1572134205", "-1.25", "1572134205.123456789", "1e5"] {
            let a = Version::parse_decimal(text).unwrap();
            let b = Version::parse_decimal(&a.to_numeric_string()).unwrap();
            assert_eq!(a, b, "{text}");
            assert!(!a.to_numeric_string().contains('e'));
        }
    }
}
