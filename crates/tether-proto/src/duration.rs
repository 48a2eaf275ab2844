//! Human durations: `"15s"`, `"500ms"`, `"2m"`, `"1h30m"`, `"4.5s"`, a bare number of seconds.
//!
//! Used by every flag and config value that takes a duration (`--detect-within 30s`,
//! `--path 240`), and by every message that shows one, so that what tether prints can be
//! pasted back into a flag.
//!
//! Grammar (whitespace around the whole value is ignored):
//!
//! ```text
//! duration  = number                 ; bare number: seconds ("240", "1.5")
//!           | component+             ; "1h30m", "2m30.5s", "500ms"
//! component = number unit
//! number    = digits [ "." digits ]  ; no sign, no exponent
//! unit      = "d" | "h" | "m" | "s" | "ms" | "us" | "µs" | "ns"
//! ```
//!
//! Units must appear from largest to smallest, each at most once (`"30m1h"` and `"1s1s"` are
//! errors: they are almost certainly typos). Values are exact to the nanosecond; fractional
//! digits beyond nanoseconds are truncated.
//!
//! [`format()`] is the inverse: `parse(&format(d)) == Ok(d)` for every `d` (tested).

use std::fmt;
use std::time::Duration;

/// Why a duration string was rejected. The message names the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Nothing but whitespace.
    #[error("empty duration: expected e.g. \"15s\", \"500ms\", \"1h30m\" or a number of seconds")]
    Empty,
    /// The text does not follow the grammar.
    #[error("invalid duration {input:?}: {problem} (expected e.g. \"15s\", \"500ms\", \"1h30m\" or a number of seconds)")]
    Invalid {
        /// The whole value as given.
        input: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The value does not fit in a [`Duration`].
    #[error("duration {input:?} is too large")]
    Overflow {
        /// The whole value as given.
        input: String,
    },
}

/// Nanoseconds per unit, with the unit's rank (larger units first).
const UNITS: &[(&str, u128)] = &[
    ("d", 86_400_000_000_000),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("µs", 1_000),
    ("ns", 1),
];

fn unit_nanos(unit: &str) -> Option<(usize, u128)> {
    // "us" and "µs" share a rank so that they exclude each other.
    let rank = |i: usize| if i >= 6 { i - 1 } else { i };
    UNITS
        .iter()
        .position(|(u, _)| *u == unit)
        .map(|i| (rank(i), UNITS[i].1))
}

/// Parses a human duration (see the [module docs](self) for the grammar).
///
/// ```
/// use std::time::Duration;
/// use tether_proto::duration::parse;
/// assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
/// assert_eq!(parse("4.5s"), Ok(Duration::from_millis(4500)));
/// assert_eq!(parse("240"), Ok(Duration::from_secs(240)));
/// assert!(parse("4 minutes").is_err());
/// ```
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let invalid = |problem: String| DurationError::Invalid {
        input: input.to_string(),
        problem,
    };
    let overflow = || DurationError::Overflow {
        input: input.to_string(),
    };

    let mut rest = s;
    let mut total: u128 = 0;
    let mut last_rank: Option<usize> = None;
    let mut components = 0usize;
    while !rest.is_empty() {
        // Number: digits [ "." digits ].
        let num_len = rest
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_digit() || c == '.'))
            .map_or(rest.len(), |(i, _)| i);
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() {
            let c = rest.chars().next().unwrap_or(' ');
            return Err(invalid(if c == '-' {
                "negative durations are not allowed".to_string()
            } else {
                format!("expected a number at {rest:?}")
            }));
        }
        let (whole, frac) = match num.split_once('.') {
            Some((w, f)) => (w, f),
            None => (num, ""),
        };
        if frac.contains('.') || (whole.is_empty() && frac.is_empty()) {
            return Err(invalid(format!("{num:?} is not a number")));
        }
        if num.ends_with('.') || num.starts_with('.') && frac.is_empty() {
            return Err(invalid(format!("{num:?} is not a number")));
        }
        // Unit: letters (and µ) up to the next digit.
        let unit_len = after
            .char_indices()
            .find(|&(_, c)| c.is_ascii_digit() || c == '.')
            .map_or(after.len(), |(i, _)| i);
        let (unit, next) = after.split_at(unit_len);
        let (rank, nanos_per) = if unit.is_empty() {
            if components == 0 && next.is_empty() {
                (3, 1_000_000_000) // bare number: seconds
            } else {
                return Err(invalid(format!("number {num:?} has no unit")));
            }
        } else {
            match unit_nanos(unit) {
                Some(u) => u,
                None => {
                    return Err(invalid(format!(
                        "unknown unit {unit:?} (use d, h, m, s, ms, us or ns)"
                    )))
                }
            }
        };
        if let Some(last) = last_rank {
            if rank <= last {
                return Err(invalid(format!(
                    "unit {unit:?} out of order: write units from largest to smallest, each once"
                )));
            }
        }
        last_rank = Some(rank);

        let whole_v: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse::<u128>().map_err(|_| overflow())?
        };
        // Fraction, exact to the nanosecond of the result.
        let mut frac_nanos: u128 = 0;
        let mut scale = nanos_per;
        for d in frac.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            frac_nanos += u128::from(d - b'0') * scale;
        }
        let comp = whole_v
            .checked_mul(nanos_per)
            .and_then(|v| v.checked_add(frac_nanos))
            .ok_or_else(overflow)?;
        total = total.checked_add(comp).ok_or_else(overflow)?;
        components += 1;
        rest = next;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| overflow())?;
    // The remainder is below 10^9 and fits in u32.
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Formats a duration the way [`parse`] reads it: `"0s"`, `"500ms"`, `"4.5s"`, `"4m"`,
/// `"1h30m"`, `"2h11m15s"`, `"1.5us"`. Exact (no rounding), so `parse(&format(d)) == Ok(d)`.
pub fn format(d: Duration) -> String {
    Human(d).to_string()
}

/// A [`Duration`] that displays in the human format of [`format()`]; handy in `format!` and
/// error messages: `format!("{}", Human(d))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.is_zero() {
            return f.write_str("0s");
        }
        let secs = d.as_secs();
        let nanos = d.subsec_nanos();
        if secs == 0 {
            // Below a second: the largest unit that keeps it short.
            let (unit, per) = if nanos >= 1_000_000 {
                ("ms", 1_000_000)
            } else if nanos >= 1_000 {
                ("us", 1_000)
            } else {
                ("ns", 1)
            };
            write_decimal(f, u64::from(nanos / per), nanos % per, per)?;
            return f.write_str(unit);
        }
        let h = secs / 3600;
        let m = (secs % 3600) / 60;
        let s = secs % 60;
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 || nanos > 0 {
            write_decimal(f, s, nanos, 1_000_000_000)?;
            f.write_str("s")?;
        }
        Ok(())
    }
}

impl Human {
    /// `d` truncated to the millisecond: how measured durations are shown in logs, tables
    /// and the status page (`"5.143s"`, `"98ms"`, `"4m5.2s"`), never with nanoseconds.
    pub fn ms(d: Duration) -> Human {
        Human(Duration::from_millis(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        ))
    }

    /// `d` truncated to the microsecond, for round-trip times (`"1.234ms"`, `"87us"`).
    pub fn us(d: Duration) -> Human {
        Human(Duration::from_micros(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
        ))
    }
}

/// Writes `whole.frac` where `frac` is in units of `1/per`, trailing zeros trimmed.
fn write_decimal(f: &mut fmt::Formatter<'_>, whole: u64, frac: u32, per: u32) -> fmt::Result {
    write!(f, "{whole}")?;
    if frac == 0 {
        return Ok(());
    }
    let width = per.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    write!(f, ".{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse("15s"), Ok(ms(15_000)));
        assert_eq!(parse("500ms"), Ok(ms(500)));
        assert_eq!(parse("2m"), Ok(ms(120_000)));
        assert_eq!(parse("1h30m"), Ok(ms(5_400_000)));
        assert_eq!(parse("4.5s"), Ok(ms(4_500)));
        assert_eq!(parse("240"), Ok(ms(240_000)));
        assert_eq!(parse(" 1.25 "), Ok(ms(1_250)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse("1.5us"), Ok(Duration::from_nanos(1_500)));
        assert_eq!(parse("1µs"), Ok(Duration::from_nanos(1_000)));
        assert_eq!(parse("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse(".5s"), Ok(ms(500)));
        assert_eq!(parse("2h11m15s"), Ok(Duration::from_secs(7875)));
        assert_eq!(parse("1m0.5s"), Ok(ms(60_500)));
    }

    #[test]
    fn rejects_bad_values_and_names_them() {
        for bad in [
            "abc",
            "4 minutes",
            "-5s",
            "1.2.3s",
            "5x",
            "30m1h",
            "1s1s",
            "1us1µs",
            "1h30",
            ".",
            "5.s",
            "s",
        ] {
            let err = parse(bad).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "{bad}: {msg}");
        }
        assert_eq!(parse("   "), Err(DurationError::Empty));
        assert!(matches!(
            parse("99999999999999999999999h"),
            Err(DurationError::Overflow { .. })
        ));
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format(Duration::ZERO), "0s");
        assert_eq!(format(ms(500)), "500ms");
        assert_eq!(format(ms(4_500)), "4.5s");
        assert_eq!(format(ms(240_000)), "4m");
        assert_eq!(format(ms(5_400_000)), "1h30m");
        assert_eq!(format(Duration::from_secs(7875)), "2h11m15s");
        assert_eq!(format(Duration::from_nanos(1_500)), "1.5us");
        assert_eq!(format(Duration::from_nanos(2_500_000)), "2.5ms");
        assert_eq!(format(ms(3_333)), "3.333s");
        assert_eq!(format(Duration::from_secs(90_000)), "25h");
    }

    #[test]
    fn truncates_measured_durations() {
        let d = Duration::from_nanos(5_143_303_870);
        assert_eq!(Human::ms(d).to_string(), "5.143s");
        assert_eq!(
            Human::ms(Duration::from_nanos(98_916_615)).to_string(),
            "98ms"
        );
        assert_eq!(Human::ms(Duration::from_micros(999)).to_string(), "0s");
        assert_eq!(
            Human::ms(Duration::from_millis(245_200)).to_string(),
            "4m5.2s"
        );
        assert_eq!(
            Human::us(Duration::from_nanos(1_234_567)).to_string(),
            "1.234ms"
        );
        assert_eq!(Human::us(Duration::from_nanos(87_900)).to_string(), "87us");
    }
}
