//! Human units for config files: byte sizes (`"4MiB"`), durations (`"30s"`) and rates
//! (`"50MiB/s"`).
//!
//! Each type parses with [`FromStr`], prints with `Display` in a form that parses back to
//! the same value, serializes as that string and deserializes from either a string or an
//! integer (bytes, seconds, bytes per second). Deserialization uses `deserialize_any`, so
//! it is meant for self-describing formats such as TOML and JSON.
//!
//! Parsing is exact: `"1.5GiB"` is accepted because it is a whole number of bytes,
//! `"1.1KiB"` is rejected because it is not.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Size units, matched case-insensitively; a bare number is bytes.
const SIZE_UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("kib", KIB),
    ("mib", MIB),
    ("gib", GIB),
    ("tib", TIB),
];

/// Units `ByteSize` prints, largest first; smaller amounts print as bytes.
const SIZE_DISPLAY: &[(&str, u64)] = &[("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Duration units in nanoseconds, matched case-sensitively (so `"5M"` is not silently
/// taken for minutes when someone meant months).
const DURATION_UNITS: &[(&str, u64)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("d", 86_400 * NANOS_PER_SEC),
];

/// Units `HumanDuration` prints, largest first.
const DURATION_DISPLAY: &[(&str, u64)] = &[
    ("d", 86_400 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// A config value in human units that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {input:?}: {problem}")]
pub struct UnitError {
    /// What was being parsed: `"size"`, `"duration"` or `"rate"`.
    pub kind: &'static str,
    /// The input as given.
    pub input: String,
    /// What is wrong with it.
    pub problem: UnitProblem,
}

/// What is wrong with a value in human units.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitProblem {
    /// Nothing but whitespace.
    #[error("empty")]
    Empty,
    /// Starts with a minus sign.
    #[error("negative")]
    Negative,
    /// The number part is missing or malformed.
    #[error("expected a number")]
    NotANumber,
    /// The unit is not one this type knows.
    #[error("unknown unit {0:?}")]
    UnknownUnit(String),
    /// A duration string without a unit.
    #[error("missing unit")]
    MissingUnit,
    /// A rate with a size unit but no `/s`.
    #[error("missing \"/s\"")]
    MissingPerSecond,
    /// Does not fit the type.
    #[error("too large")]
    TooLarge,
    /// A fraction that does not come out whole in the base unit.
    #[error("not a whole number of {0}")]
    NotWhole(&'static str),
}

/// A number of bytes, written `"4MiB"`, `"64 MiB"`, `"10GB"`, `"1.5GiB"` or `"4096"`.
///
/// Units: `B`; decimal `KB`, `MB`, `GB`, `TB`; binary `KiB`, `MiB`, `GiB`, `TiB`; any case.
/// A bare number is bytes. Prints in the largest binary unit that is exact (`"1536KiB"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The number of bytes.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse_size(s).map(Self).map_err(|problem| UnitError {
            kind: "size",
            input: s.to_owned(),
            problem,
        })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        if bytes != 0 {
            for &(name, unit) in SIZE_DISPLAY {
                if bytes.is_multiple_of(unit) {
                    return write!(f, "{}{name}", bytes / unit);
                }
            }
        }
        write!(f, "{bytes}B")
    }
}

/// A length of time, written `"30s"`, `"500ms"`, `"5m"`, `"1h"`, `"2d"`, `"1.5s"` or
/// `"100us"`.
///
/// Units: `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`, `d`, lowercase. A string needs a unit;
/// a bare integer is accepted as seconds only when deserializing (`timeout = 30`).
/// Prints in the largest exact unit (`"1500ms"`, `"5m"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The duration.
    pub fn as_duration(self) -> Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse_duration(s).map(Self).map_err(|problem| UnitError {
            kind: "duration",
            input: s.to_owned(),
            problem,
        })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        let (name, unit) = DURATION_DISPLAY
            .iter()
            .map(|&(name, unit)| (name, u128::from(unit)))
            .find(|&(_, unit)| nanos.is_multiple_of(unit))
            .expect("every duration is a whole number of nanoseconds");
        write!(f, "{}{name}", nanos / unit)
    }
}

/// A throughput limit in bytes per second, written `"50MiB/s"` or `"1GiB/s"`.
///
/// **`0` means unlimited**, not "no throughput". The size part takes the same units as
/// [`ByteSize`]; a size with a unit needs the `/s`, a bare number is bytes per second.
/// Prints as `"50MiB/s"`, and as `"0"` when unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(pub u64);

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate(0);

    /// Bytes per second; 0 means unlimited.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Whether this rate means "no limit".
    pub fn is_unlimited(self) -> bool {
        self.0 == 0
    }
}

impl FromStr for Rate {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse_rate(s).map(Self).map_err(|problem| UnitError {
            kind: "rate",
            input: s.to_owned(),
            problem,
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            return f.write_str("0");
        }
        write!(f, "{}/s", ByteSize(self.0))
    }
}

fn parse_size(s: &str) -> Result<u64, UnitProblem> {
    let (number, unit) = split_number(s)?;
    let scale = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))
            .map(|&(_, scale)| scale)
            .ok_or_else(|| UnitProblem::UnknownUnit(unit.to_owned()))?
    };
    let bytes = scaled(number, scale, "bytes")?;
    u64::try_from(bytes).map_err(|_| UnitProblem::TooLarge)
}

fn parse_duration(s: &str) -> Result<Duration, UnitProblem> {
    let (number, unit) = split_number(s)?;
    if unit.is_empty() {
        return Err(UnitProblem::MissingUnit);
    }
    let scale = DURATION_UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|&(_, scale)| scale)
        .ok_or_else(|| UnitProblem::UnknownUnit(unit.to_owned()))?;
    let nanos = scaled(number, scale, "nanoseconds")?;
    let per_sec = u128::from(NANOS_PER_SEC);
    let secs = u64::try_from(nanos / per_sec).map_err(|_| UnitProblem::TooLarge)?;
    let subsec = u32::try_from(nanos % per_sec).expect("remainder is below one billion");
    Ok(Duration::new(secs, subsec))
}

fn parse_rate(s: &str) -> Result<u64, UnitProblem> {
    let trimmed = s.trim();
    let split = trimmed.len().saturating_sub(2);
    if let Some(suffix) = trimmed.get(split..)
        && suffix.eq_ignore_ascii_case("/s")
    {
        let size = &trimmed[..split];
        if size.trim().is_empty() {
            return Err(UnitProblem::NotANumber);
        }
        return parse_size(size);
    }
    let bytes = parse_size(trimmed)?;
    let (_, unit) = split_number(trimmed)?;
    if !unit.is_empty() {
        return Err(UnitProblem::MissingPerSecond);
    }
    Ok(bytes)
}

/// Splits `" 1.5 GiB "` into `("1.5", "GiB")`, rejecting empty and negative input.
fn split_number(s: &str) -> Result<(&str, &str), UnitProblem> {
    let s = s.trim();
    if s.is_empty() {
        return Err(UnitProblem::Empty);
    }
    if s.starts_with('-') {
        return Err(UnitProblem::Negative);
    }
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..end], s[end..].trim_start());
    if number.is_empty() {
        return Err(UnitProblem::NotANumber);
    }
    Ok((number, unit))
}

/// The decimal `number` ("4", "1.5") times `scale`, exactly, in base units named `base`.
fn scaled(number: &str, scale: u64, base: &'static str) -> Result<u128, UnitProblem> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || (number.contains('.') && !all_digits(frac)) {
        return Err(UnitProblem::NotANumber);
    }
    let scale = u128::from(scale);
    let whole = int
        .bytes()
        .try_fold(0u128, |acc, d| {
            acc.checked_mul(10)?.checked_add(u128::from(d - b'0'))
        })
        .and_then(|int| int.checked_mul(scale))
        .ok_or(UnitProblem::TooLarge)?;
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        return Ok(whole);
    }
    // 10^38 is the largest power of ten in a u128. Longer fractions could only come out
    // whole for TiB with 39 or 40 digits; nobody writes those.
    let digits = u32::try_from(frac.len()).map_err(|_| UnitProblem::NotWhole(base))?;
    if digits > 38 {
        return Err(UnitProblem::NotWhole(base));
    }
    let numerator: u128 = frac.parse().expect("at most 38 ASCII digits fit in a u128");
    // numerator / 10^digits * scale, reduced first so nothing overflows.
    let denominator = 10u128.pow(digits);
    let common = gcd(scale, denominator);
    let (scale, denominator) = (scale / common, denominator / common);
    if !numerator.is_multiple_of(denominator) {
        return Err(UnitProblem::NotWhole(base));
    }
    // numerator / denominator * scale < scale (the fraction is below one), so no overflow.
    whole
        .checked_add(numerator / denominator * scale)
        .ok_or(UnitProblem::TooLarge)
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// What the shared serde visitor needs from each unit type.
trait HumanUnit: FromStr<Err = UnitError> {
    /// For serde's "invalid type" message.
    const EXPECTING: &'static str;
    /// The value of a bare integer in a config file.
    fn from_integer(value: u64) -> Self;
}

impl HumanUnit for ByteSize {
    const EXPECTING: &'static str = "a size such as \"4MiB\" or a number of bytes";
    fn from_integer(value: u64) -> Self {
        Self(value)
    }
}

impl HumanUnit for HumanDuration {
    const EXPECTING: &'static str = "a duration such as \"30s\" or a number of seconds";
    fn from_integer(value: u64) -> Self {
        Self(Duration::from_secs(value))
    }
}

impl HumanUnit for Rate {
    const EXPECTING: &'static str =
        "a rate such as \"50MiB/s\" or a number of bytes per second (0 = unlimited)";
    fn from_integer(value: u64) -> Self {
        Self(value)
    }
}

struct HumanVisitor<T>(PhantomData<T>);

impl<T: HumanUnit> Visitor<'_> for HumanVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Ok(T::from_integer(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        u64::try_from(v)
            .map(T::from_integer)
            .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }
}

macro_rules! serde_via_display {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_any(HumanVisitor::<Self>(PhantomData))
            }
        }
    )*};
}

serde_via_display!(ByteSize, HumanDuration, Rate);

#[cfg(test)]
mod tests {
    use super::*;
    use UnitProblem::*;
    use proptest::prelude::*;

    fn unknown(unit: &str) -> UnitProblem {
        UnknownUnit(unit.to_owned())
    }

    #[test]
    fn byte_size_parses() {
        let cases: &[(&str, Result<u64, UnitProblem>)] = &[
            ("4MiB", Ok(4 * MIB)),
            ("64 MiB", Ok(64 * MIB)),
            ("1GiB", Ok(GIB)),
            ("512KiB", Ok(512 * KIB)),
            ("10GB", Ok(10_000_000_000)),
            ("100MB", Ok(100_000_000)),
            ("4096", Ok(4096)),
            ("1.5GiB", Ok(1536 * MIB)),
            ("0", Ok(0)),
            ("0B", Ok(0)),
            ("7b", Ok(7)),
            ("4mib", Ok(4 * MIB)),
            ("4MIB", Ok(4 * MIB)),
            ("1kB", Ok(1_000)),
            ("1.25KB", Ok(1_250)),
            ("2TB", Ok(2_000_000_000_000)),
            ("1TiB", Ok(TIB)),
            ("0.5KiB", Ok(512)),
            ("1.000MiB", Ok(MIB)),
            ("007KiB", Ok(7 * KIB)),
            ("  8 KiB  ", Ok(8 * KIB)),
            ("18446744073709551615", Ok(u64::MAX)),
            ("16777215TiB", Ok(16_777_215 * TIB)),
            ("0.0009765625KiB", Ok(1)),
            ("", Err(Empty)),
            ("   ", Err(Empty)),
            ("-1", Err(Negative)),
            ("-4MiB", Err(Negative)),
            ("4XB", Err(unknown("XB"))),
            ("4 M", Err(unknown("M"))),
            ("4MiB/s", Err(unknown("MiB/s"))),
            ("4 MiB extra", Err(unknown("MiB extra"))),
            ("1_000", Err(unknown("_000"))),
            ("MiB", Err(NotANumber)),
            ("+4MiB", Err(NotANumber)),
            ("1.2.3MiB", Err(NotANumber)),
            (".5MiB", Err(NotANumber)),
            ("1.MiB", Err(NotANumber)),
            ("18446744073709551616", Err(TooLarge)),
            ("16777216TiB", Err(TooLarge)),
            ("17EB", Err(unknown("EB"))),
            ("20000000000000000000GB", Err(TooLarge)),
            ("999999999999999999999999999999999999999999", Err(TooLarge)),
            ("1.5", Err(NotWhole("bytes"))),
            ("1.1KiB", Err(NotWhole("bytes"))),
        ];
        for (input, expected) in cases {
            let got = input
                .parse::<ByteSize>()
                .map(ByteSize::as_u64)
                .map_err(|e| e.problem);
            assert_eq!(&got, expected, "input {input:?}");
        }
    }

    #[test]
    fn byte_size_error_names_the_input() {
        let err = "4XB".parse::<ByteSize>().expect_err("unknown unit");
        assert_eq!(err.to_string(), r#"invalid size "4XB": unknown unit "XB""#);
        let err = "".parse::<ByteSize>().expect_err("empty");
        assert_eq!(err.to_string(), r#"invalid size "": empty"#);
    }

    #[test]
    fn byte_size_displays() {
        let cases: &[(u64, &str)] = &[
            (0, "0B"),
            (7, "7B"),
            (1000, "1000B"),
            (KIB, "1KiB"),
            (4 * MIB, "4MiB"),
            (1536 * KIB, "1536KiB"),
            (1536 * MIB, "1536MiB"),
            (TIB, "1TiB"),
            (1024 * TIB, "1024TiB"),
            (u64::MAX, "18446744073709551615B"),
        ];
        for &(bytes, expected) in cases {
            assert_eq!(ByteSize(bytes).to_string(), expected);
        }
    }

    #[test]
    fn duration_parses() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        let cases: &[(&str, Result<Duration, UnitProblem>)] = &[
            ("30s", Ok(s(30))),
            ("500ms", Ok(ms(500))),
            ("5m", Ok(s(300))),
            ("1h", Ok(s(3_600))),
            ("2d", Ok(s(172_800))),
            ("1.5s", Ok(ms(1_500))),
            ("0s", Ok(Duration::ZERO)),
            ("100us", Ok(Duration::from_micros(100))),
            ("100µs", Ok(Duration::from_micros(100))),
            ("10ns", Ok(Duration::from_nanos(10))),
            ("0.5m", Ok(s(30))),
            (" 30 s ", Ok(s(30))),
            ("18446744073709551615s", Ok(s(u64::MAX))),
            ("", Err(Empty)),
            ("30", Err(MissingUnit)),
            ("0", Err(MissingUnit)),
            ("-1s", Err(Negative)),
            ("5M", Err(unknown("M"))),
            ("30S", Err(unknown("S"))),
            ("1w", Err(unknown("w"))),
            ("s", Err(NotANumber)),
            ("1..5s", Err(NotANumber)),
            ("1.5ns", Err(NotWhole("nanoseconds"))),
            ("18446744073709551616s", Err(TooLarge)),
            ("213503982334602d", Err(TooLarge)),
        ];
        for (input, expected) in cases {
            let got = input
                .parse::<HumanDuration>()
                .map(HumanDuration::as_duration)
                .map_err(|e| e.problem);
            assert_eq!(&got, expected, "input {input:?}");
        }
        let err = "30".parse::<HumanDuration>().expect_err("no unit");
        assert_eq!(err.to_string(), r#"invalid duration "30": missing unit"#);
    }

    #[test]
    fn duration_displays() {
        let cases: &[(Duration, &str)] = &[
            (Duration::ZERO, "0s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1_500), "1500ms"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(3_600), "1h"),
            (Duration::from_secs(172_800), "2d"),
            (Duration::from_micros(100), "100us"),
            (Duration::from_nanos(1), "1ns"),
        ];
        for &(duration, expected) in cases {
            assert_eq!(HumanDuration(duration).to_string(), expected);
        }
    }

    #[test]
    fn rate_parses() {
        let cases: &[(&str, Result<u64, UnitProblem>)] = &[
            ("50MiB/s", Ok(50 * MIB)),
            ("1GiB/s", Ok(GIB)),
            ("0", Ok(0)),
            ("0/s", Ok(0)),
            ("100MB/s", Ok(100_000_000)),
            ("1 KiB/s", Ok(KIB)),
            ("50mib/S", Ok(50 * MIB)),
            ("4096", Ok(4096)),
            ("4096/s", Ok(4096)),
            ("", Err(Empty)),
            ("/s", Err(NotANumber)),
            ("50MiB", Err(MissingPerSecond)),
            ("50XB/s", Err(unknown("XB"))),
            ("50MiB/m", Err(unknown("MiB/m"))),
            ("-1MiB/s", Err(Negative)),
            ("16777216TiB/s", Err(TooLarge)),
        ];
        for (input, expected) in cases {
            let got = input
                .parse::<Rate>()
                .map(Rate::as_u64)
                .map_err(|e| e.problem);
            assert_eq!(&got, expected, "input {input:?}");
        }
        assert!("0".parse::<Rate>().expect("zero").is_unlimited());
        let err = "50MiB".parse::<Rate>().expect_err("no /s");
        assert_eq!(err.to_string(), r#"invalid rate "50MiB": missing "/s""#);
    }

    #[test]
    fn rate_displays() {
        let cases: &[(u64, &str)] = &[
            (0, "0"),
            (7, "7B/s"),
            (50 * MIB, "50MiB/s"),
            (GIB, "1GiB/s"),
        ];
        for &(rate, expected) in cases {
            assert_eq!(Rate(rate).to_string(), expected);
        }
        assert_eq!(Rate::UNLIMITED.to_string(), "0");
    }

    #[derive(Debug, PartialEq, Deserialize, Serialize)]
    struct Config {
        size: ByteSize,
        timeout: HumanDuration,
        limit: Rate,
    }

    #[test]
    fn serde_reads_strings_and_integers() {
        let cases: &[(&str, Config)] = &[
            (
                "size = \"4MiB\"\ntimeout = \"30s\"\nlimit = \"50MiB/s\"",
                Config {
                    size: ByteSize(4 * MIB),
                    timeout: HumanDuration(Duration::from_secs(30)),
                    limit: Rate(50 * MIB),
                },
            ),
            (
                "size = 4096\ntimeout = 30\nlimit = 0",
                Config {
                    size: ByteSize(4096),
                    timeout: HumanDuration(Duration::from_secs(30)),
                    limit: Rate::UNLIMITED,
                },
            ),
        ];
        for (text, expected) in cases {
            let got: Config = toml::from_str(text).expect(text);
            assert_eq!(&got, expected);
        }
    }

    #[test]
    fn serde_rejects_bad_values() {
        let cases: &[(&str, &str)] = &[
            (
                r#"size = "4XB""#,
                r#"invalid size "4XB": unknown unit "XB""#,
            ),
            ("size = -1", "invalid value: integer `-1`, expected a size"),
            (
                "size = 1.5",
                "invalid type: floating point `1.5`, expected a size",
            ),
            (
                r#"timeout = "30""#,
                r#"invalid duration "30": missing unit"#,
            ),
            (
                "limit = true",
                "invalid type: boolean `true`, expected a rate",
            ),
        ];
        for (bad_line, expected) in cases {
            let name = bad_line.split(' ').next().expect("field name");
            let text = ["size = 1", "timeout = 1", "limit = 1"]
                .map(|good| {
                    if good.starts_with(name) {
                        *bad_line
                    } else {
                        good
                    }
                })
                .join("\n");
            let err = toml::from_str::<Config>(&text)
                .expect_err(&text)
                .to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn serde_writes_display_strings() {
        let config = Config {
            size: ByteSize(1536 * KIB),
            timeout: HumanDuration(Duration::from_millis(500)),
            limit: Rate(GIB),
        };
        let text = toml::to_string(&config).expect("serialize");
        assert_eq!(
            text,
            "size = \"1536KiB\"\ntimeout = \"500ms\"\nlimit = \"1GiB/s\"\n"
        );
        assert_eq!(toml::from_str::<Config>(&text).expect("parse back"), config);
    }

    proptest! {
        #[test]
        fn byte_size_display_round_trips(bytes in any::<u64>()) {
            let text = ByteSize(bytes).to_string();
            prop_assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)));
        }

        #[test]
        fn byte_size_binary_multiples_round_trip(n in 1u64..1 << 20, shift in 0u32..44) {
            let bytes = n << shift;
            let text = ByteSize(bytes).to_string();
            prop_assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)));
        }

        #[test]
        fn duration_display_round_trips(secs in any::<u64>(), nanos in 0u32..1_000_000_000) {
            let duration = HumanDuration(Duration::new(secs, nanos));
            let text = duration.to_string();
            prop_assert_eq!(text.parse::<HumanDuration>(), Ok(duration));
        }

        #[test]
        fn rate_display_round_trips(rate in any::<u64>()) {
            let text = Rate(rate).to_string();
            prop_assert_eq!(text.parse::<Rate>(), Ok(Rate(rate)));
        }
    }
}

/// A Unix time in UTC as (year, month, day, hour, minute, second), proleptic Gregorian (the
/// era-based days-to-civil algorithm, March-based years).
pub fn civil_utc(unix: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m as u32,
        d as u32,
        (secs / 3600) as u32,
        (secs / 60 % 60) as u32,
        (secs % 60) as u32,
    )
}

#[cfg(test)]
mod civil_tests {
    #[test]
    fn known_dates() {
        assert_eq!(super::civil_utc(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(super::civil_utc(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(super::civil_utc(1_798_761_599), (2026, 12, 31, 23, 59, 59));
    }
}
