//! Budget periods: calendar days, ISO weeks (from Monday), calendar months,
//! or `total` (one period that never ends), aligned in a time zone.
//!
//! Zones are UTC or fixed offsets (`"+08:00"`, `"-05:30"`). Named zones
//! with daylight saving (`"Europe/Paris"`) would need the tz database; a
//! crate for it (jiff, chrono-tz) is not in the tree, and a budget's reset
//! an hour off twice a year is not worth the build time. docs/budgets.md
//! says so.
//!
//! Time is whole seconds since the Unix epoch (`i64`), from a `Clock`, so
//! tests can roll periods over without waiting.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Week,
    Month,
    /// A prepaid credit: never resets.
    Total,
}

impl Period {
    pub fn parse(text: &str) -> Option<Period> {
        match text {
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            "total" => Some(Period::Total),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    /// `[start, end)` of the period holding `now`, in Unix seconds, aligned
    /// in `zone`. `Total`: `[0, i64::MAX)`.
    pub fn bounds(self, zone: Zone, now: i64) -> Bounds {
        const DAY: i64 = 86_400;
        let offset = i64::from(zone.offset_secs);
        let local = now + offset;
        let day = local.div_euclid(DAY);
        let (start_day, end_day) = match self {
            Period::Total => {
                return Bounds {
                    start: 0,
                    end: i64::MAX,
                }
            }
            Period::Day => (day, day + 1),
            Period::Week => {
                // 1970-01-01 was a Thursday: Monday is day 4 of that week.
                let monday = day - (day + 3).rem_euclid(7);
                (monday, monday + 7)
            }
            Period::Month => {
                let (y, m, _) = civil_from_days(day);
                let next = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (days_from_civil(y, m, 1), days_from_civil(next.0, next.1, 1))
            }
        };
        Bounds {
            start: start_day * DAY - offset,
            end: end_day * DAY - offset,
        }
    }
}

/// A period: `[start, end)` in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub start: i64,
    pub end: i64,
}

impl Bounds {
    pub fn resets(&self) -> bool {
        self.end != i64::MAX
    }

    /// The start as a local calendar date `YYYYMMDD` (Redis keys), or
    /// `total`.
    pub fn label(&self, zone: Zone) -> String {
        if !self.resets() {
            return "total".into();
        }
        let (y, m, d) = civil_from_days((self.start + i64::from(zone.offset_secs)).div_euclid(86_400));
        format!("{y:04}{m:02}{d:02}")
    }
}

/// A fixed offset from UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zone {
    pub offset_secs: i32,
}

impl Zone {
    pub const UTC: Zone = Zone { offset_secs: 0 };

    /// `UTC`, `Z`, `+08:00`, `-0530`, `+8`.
    pub fn parse(text: &str) -> Option<Zone> {
        let t = text.trim();
        if matches!(t, "UTC" | "utc" | "Z" | "z" | "Etc/UTC" | "GMT") {
            return Some(Zone::UTC);
        }
        let (sign, rest) = match t.as_bytes().first()? {
            b'+' => (1, &t[1..]),
            b'-' => (-1, &t[1..]),
            _ => return None,
        };
        let (h, m) = match rest.split_once(':') {
            Some((h, m)) => (h, m),
            None if rest.len() == 4 => rest.split_at(2),
            None => (rest, "0"),
        };
        let all_digits = |s: &str| !s.is_empty() && s.len() <= 2 && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(h) || !all_digits(m) {
            return None;
        }
        let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
        if h > 14 || m > 59 {
            return None;
        }
        Some(Zone {
            offset_secs: sign * (h * 3600 + m * 60),
        })
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.offset_secs == 0 {
            return f.write_str("UTC");
        }
        let sign = if self.offset_secs < 0 { '-' } else { '+' };
        let a = self.offset_secs.abs();
        write!(f, "{sign}{:02}:{:02}", a / 3600, a % 3600 / 60)
    }
}

/// RFC 3339 in UTC, whole seconds.
pub fn rfc3339(unix: i64) -> String {
    let secs = u64::try_from(unix).unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

/// Where budgets read the time.
pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch.
    fn now(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }
}

/// A clock tests set by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(unix: i64) -> ManualClock {
        ManualClock(AtomicI64::new(unix))
    }

    pub fn set(&self, unix: i64) {
        self.0.store(unix, Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::Acquire)
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now(&self) -> i64 {
        (**self).now()
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of `days_from_civil`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        humantime::parse_rfc3339(text)
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn span(p: Period, zone: &str, now: &str) -> (String, String) {
        let b = p.bounds(Zone::parse(zone).unwrap(), at(now));
        (rfc3339(b.start), rfc3339(b.end))
    }

    #[test]
    fn periods_are_calendar_aligned_in_their_zone() {
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(
            span(Period::Day, "UTC", "2025-06-15T13:00:00Z"),
            s("2025-06-15T00:00:00Z", "2025-06-16T00:00:00Z")
        );
        // 20:00 UTC is already the 16th at +08:00: that day began at 16:00 UTC.
        assert_eq!(
            span(Period::Day, "+08:00", "2025-06-15T20:00:00Z"),
            s("2025-06-15T16:00:00Z", "2025-06-16T16:00:00Z")
        );
        assert_eq!(
            span(Period::Day, "-05:00", "2025-06-15T03:00:00Z"),
            s("2025-06-14T05:00:00Z", "2025-06-15T05:00:00Z")
        );
        // 2025-06-15 is a Sunday: its ISO week began Monday the 9th.
        assert_eq!(
            span(Period::Week, "UTC", "2025-06-15T23:59:59Z"),
            s("2025-06-09T00:00:00Z", "2025-06-16T00:00:00Z")
        );
        assert_eq!(
            span(Period::Week, "UTC", "2025-06-16T00:00:00Z"),
            s("2025-06-16T00:00:00Z", "2025-06-23T00:00:00Z")
        );
        assert_eq!(
            span(Period::Month, "UTC", "2025-12-31T23:59:59Z"),
            s("2025-12-01T00:00:00Z", "2026-01-01T00:00:00Z")
        );
        assert_eq!(
            span(Period::Month, "UTC", "2024-02-29T12:00:00Z"),
            s("2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z")
        );
        assert_eq!(
            span(Period::Month, "+09:00", "2025-06-30T16:00:00Z"),
            s("2025-06-30T15:00:00Z", "2025-07-31T15:00:00Z")
        );
        let total = Period::Total.bounds(Zone::UTC, at("2025-06-15T13:00:00Z"));
        assert!(!total.resets());
        assert_eq!(total.label(Zone::UTC), "total");
        let b = Period::Month.bounds(Zone::parse("+08:00").unwrap(), at("2025-06-30T20:00:00Z"));
        assert_eq!(b.label(Zone::parse("+08:00").unwrap()), "20250701");
    }

    #[test]
    fn civil_dates_round_trip() {
        for day in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn zones_parse_and_print() {
        for (text, secs, shown) in [
            ("UTC", 0, "UTC"),
            ("+08:00", 28_800, "+08:00"),
            ("-05:30", -19_800, "-05:30"),
            ("+0930", 34_200, "+09:30"),
            ("+8", 28_800, "+08:00"),
        ] {
            let z = Zone::parse(text).unwrap();
            assert_eq!((z.offset_secs, z.to_string().as_str()), (secs, shown), "{text}");
        }
        for bad in ["Europe/Paris", "+15:00", "+08:60", "08:00", "+", "+0a:00", ""] {
            assert!(Zone::parse(bad).is_none(), "{bad}");
        }
    }
}
